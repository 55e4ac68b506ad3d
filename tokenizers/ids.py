"""The special token ids of the XLM-R convention BEiT-3 uses (the table in :mod:`beit3.tokenizers.text`).

Their one definition, in a module that imports nothing, so that programs with torch alone (bench/gpu_giant.py
on a GPU machine) use these ids rather than copies; ``beit3.tokenizers.text`` re-exports them.
"""

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
FIRST_ORDINARY_ID = UNK_ID + 1  # the lowest id of an ordinary piece (random replacements start here)
