"""The composition root: the `modtag` command line and the embedded one-command stack."""
