from mscenario.cli import entry

entry()
