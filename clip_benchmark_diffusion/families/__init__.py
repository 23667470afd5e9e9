"""Model families: one small module per kind of diffusers pipeline (see :mod:`.base`).

Families are registered through the same pluggy mechanism as recipes (the ``register_families``
hook), so another package can add one; :mod:`.builtin` registers the ones shipped here.
"""
