"""Exported predictors: the artefact format (format.py, read by the serving side) and the
writer (writer.py, training side: a work dir -> a servable version).

Deliberately empty: importing `mscenario.export.format` must not load the writer, which
imports the training code a serving host does not need.
"""
