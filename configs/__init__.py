"""The YAML configs, shipped as package data (``stdit.configs``): ``stdit train tiny`` finds them installed."""
