from comm_sgd.cli import entry_point

entry_point()
