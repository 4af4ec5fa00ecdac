"""RNST: Regularization by Neural Style Transfer (Shen et al., Front. Artif. Intell. 2025).

Low-field MRI slices (the content) are pulled towards high-field quality with a high-field image
of another scan as the style, through a RED-style loop around Gatys neural style transfer on
VGG16 features. Pure Python (no Qt, no slicer); TensorFlow/Keras are imported only when used.
"""
__version__ = "0.1.0"
