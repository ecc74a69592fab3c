"""Models: a backbone from any source, cut into a frozen extractor, with a head.

- ``builtin`` / ``lenet``: the built-in models by name.
- ``backbones``: build a backbone (timm, torchvision, built-in, checkpoint, module:callable).
- ``weights``: load a weights file (safetensors, or torch.load with weights_only=True).
- ``checkpoint``: the safetensors checkpoint file with its JSON metadata.
- ``classifier``: fine-tuned classifiers saved and loaded (``load_model``).
- ``cuts``: cut specs -> ``FrozenExtractor``; ``list_cut_points``.
- ``multicut``: several cuts in one pass of the base -> ``MultiCutExtractor``.
- ``fusion``: frozen BatchNorm folded into the convolution before it.
- ``heads``: linear / MLP / keep heads on a cut.
- ``extractor``: backbone + one cut or several + preprocessing in one call
  (``build_extractor``, ``extractor_from_config``, ``load_backbone``).
- ``engine``: the frozen forward pass every command runs (``FeatureComputer``).
"""
