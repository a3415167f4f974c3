"""The operating system's side: processes identified by (pid, start time),
whole trees, cgroups, the child subreaper, and the spawners that start an
instance's root. Nothing here holds daemon state; the engine does."""
