"""Model card templates that `fm-indexer push` fills. This folder is the one copy: pyproject.toml installs it as
the package `fm_transformers.model_cards`, so the templates are read with importlib.resources from a checkout,
an editable install or a wheel alike."""
