"""The `jaxlm` command: the argument parser (`main`) and the command bodies (`commands`)."""
