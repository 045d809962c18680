"""mta-lab: which parts of Multi-Token Attention matter, by how much, with what certainty, at what cost.

Layers, each depending only on the ones before it: config -> model -> train -> sweep -> analysis -> cli.
"""

__version__ = "0.1.0"
