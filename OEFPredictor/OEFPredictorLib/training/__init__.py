"""Training, in one place: the data the models learn from, the noise they see, the calibration of
their interval and the fitting with its bookkeeping, shared by the trainers:

- data         the fixed seeds, noise-free stroke-like virtual patients, the drawn acquisitions
- noise        Rician magnitude noise, receive bias, QSM noise
- calibration  split-conformal calibration of the 90 % OEF interval (Mondrian for the default model)
- fitting      epoch log, resume state, time budget, early stopping, checkpoints, the run's record
- context      the default model (the protocol-free spatial context network): `oefpredictor train --arch context`
- unet         the experimental 3D U-Net, kept apart from the default model's path: `--arch unet`
- lstm         the paper's LSTM and the voxelwise DNN / GRU on a simulated data set: `--arch lstm|dnn|gru`
"""
