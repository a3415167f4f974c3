"""The control socket: the listener and its authorization, connections, the
read hub, and the one table of methods (`supervisor.server.methods`)."""
