"""OEFPredictorLib: oxygen extraction fraction (OEF) mapping from mGRE magnitude + QSM.

The pure-Python core of the OEFPredictor 3D Slicer extension (no Qt, no slicer imports):
QQ physics, virtual patients, the methods (spatial context network, the paper's LSTM, QQ fits),
inference, statistics, I/O and the `oefpredictor` command.
"""
__version__ = "0.1.0"

import logging as _logging

# A library does not print: without this, Python's last-resort handler printed every engine
# warning to stderr, and the command line printed it again. Applications (Slicer, a script with
# logging.basicConfig) still receive the records through their own handlers.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
