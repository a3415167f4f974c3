"""The pure core: the registry of instances and leases, the wire codec, the
errors, the config schema and command templates. No I/O beyond reading a
config file, no trio, no clock: everything here is tested synchronously."""
