"""Glue for other libraries, each an optional dependency imported only by its own module:

* :mod:`sparseattn.integrations.transformers`: ``attn_implementation="sparseattn"`` for Hugging
  Face transformers models (``pip install "sparseattn[hf]"``)::

      from sparseattn.integrations import transformers as sat
      sat.register()

Importing ``sparseattn`` (or this package) never imports transformers.
"""
