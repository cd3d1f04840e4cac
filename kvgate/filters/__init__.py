"""The built-in filters. Each module registers its kind with :func:`kvgate.chain.register_filter` when imported;
:mod:`kvgate.registry` (the plugin index) imports them all."""
