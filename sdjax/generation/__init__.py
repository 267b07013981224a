"""Generation, split in two: the host side (:mod:`.request`: a typed, checked request; :mod:`.host`: plan,
inputs, placement on devices, decoding) and the traced core (:mod:`.core`: one jitted function per plan)."""

from sdjax.generation.core import Inputs, Model, Plan
from sdjax.generation.host import Prepared, batch_key, concat, decode, execute, prepare, run, split
from sdjax.generation.request import Request, SDXLOptions

__all__ = ["Inputs", "Model", "Plan", "Prepared", "Request", "SDXLOptions", "batch_key", "concat", "decode",
           "execute", "prepare", "run", "split"]
