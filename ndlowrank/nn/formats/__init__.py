"""The LoRA-family adapter formats other tools read: PEFT, diffusers, kohya LoRA/LoCon and LyCORIS LoCon-Tucker.

One module per format (``check`` a layer, give its ``layers`` form, ``write`` a file, ``read``
one); the maths they share is in :mod:`._layer`; the entry points
(:func:`~ndlowrank.nn.export_adapters`, :func:`~ndlowrank.nn.import_adapters`,
:func:`~ndlowrank.nn.combine_adapters`) are in :mod:`ndlowrank.nn.interop`.
"""

from . import diffusers, kohya, lycoris, peft

FORMATS = {"peft": peft, "diffusers": diffusers, "kohya": kohya, "lycoris": lycoris}

__all__ = ["FORMATS"]
