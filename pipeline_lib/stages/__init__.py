"""One module per stage; each exposes a ``run(config, inputs, out_dir) -> metrics`` function."""
