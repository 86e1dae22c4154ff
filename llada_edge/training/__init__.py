"""Training the tiny checkpoint that the accuracy report measures on (``synth --preset tiny-trained``).

Random weights give flat logits and near-tied routers, so quantization error shows up as noise in
top-1 agreement. These modules train the tiny preset here, on this CPU, on data that ships with the
environment (the Python standard library's own text; procedural captioned scenes), and write the
result back in the exact upstream layout.
"""
