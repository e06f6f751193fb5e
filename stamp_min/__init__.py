"""stamp_min: STAMP (heterogeneous federated continual learning with spatio-temporal gradient
matching and a prototypical coreset) and FLoRA-NA (federated LoRA aggregation), small enough to
read in an evening. One concept per module; see README.md for the map.

This file imports no submodule on purpose: `import stamp_min.gradmatch` pulls in torch and that
file alone.
"""

__version__ = "0.1.0"


class UserError(ValueError):
    """A mistake in user input (a config field, a path, a dataset name).

    The message is one line that names the field, the value and what is allowed; the CLIs print
    it and exit with status 2 instead of showing a traceback.
    """
