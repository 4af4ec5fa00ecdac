"""The Slicer side of the extension, shared by its two modules (may import slicer, vtk and qt;
OEFPredictorLib may not).

- compat: the imports that exist only inside the Slicer application, with the fallbacks that let
  the Logic be imported and tested under the slicer-core wheel (no Qt, no application);
- processing: the panel's processing state (idle, installing, running, cancelling) driving the
  Apply/Cancel button and the progress bar, and the QTimer that polls a background job;
- environment: Python packages (installed versions; installs through slicer.packaging), the model
  card and backend summaries;
- prediction: MRML nodes -> PredictionInputs, the background run, the output volumes;
- display: colour tables, window/level, threshold, the overlay and its colour legend;
- comparison: ROI masks, the statistics table, the difference map, plots and the comparison layout.
"""
