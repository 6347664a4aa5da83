"""The built-in demos: planted-concept scenes explained end to end, offline, on a CPU.

- :mod:`~lavise.demos.demo` (``lavise demo``): two targets named in words;
- :mod:`~lavise.demos.bias` (``lavise demo-bias``): a planted bias found without labels;
- :mod:`~lavise.demos.scene_training`: training the small scene CNN they both use;
- :mod:`~lavise.demos.common`: their targets and work done once per key.
"""
