"""The command-line programs: train, convert, prepare, plot.

They sit on top of everything: each reads a config (``nemo_dpo.config``, the
only place that knows every section) or its own flags, then calls down into
the packages. Nothing below this folder imports it or the config module.
"""
