from trainstep.cli import entry_point

entry_point()
