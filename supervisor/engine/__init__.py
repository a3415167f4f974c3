"""The engine: the one facade the server calls (`Engine`), which asks the
registry what must happen and carries it out: instance life, the sweep, the
scan cache, the durable record, the reports and the metrics."""
