"""Drop-in modules: same constructor arguments, ``state_dict`` keys and semantics as torch's.
Each op family appends its own import line below."""
from tilefuse.nn.linear import Linear  # noqa: F401
