"""Factored modules and what is done with them: the layers of every format, surgery on a model, BN folding,
the fastest exact realization of a layer. Import the modules themselves (``admm.nn.layers``, ...)."""
