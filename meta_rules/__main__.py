from meta_rules.cli import entry_point

entry_point()
