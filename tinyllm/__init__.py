"""tinyllm: how a large language model is made, in readable NumPy + autograd code."""
