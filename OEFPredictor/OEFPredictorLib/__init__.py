"""OEFPredictorLib: oxygen extraction fraction (OEF) mapping from mGRE magnitude + QSM.

The pure-Python core of the OEFPredictor 3D Slicer extension (no Qt, no slicer imports):
QQ physics, virtual patients, the paper's LSTM, inference, baselines, statistics, I/O and the
`oefpredictor` command.
"""
__version__ = "0.1.0"
