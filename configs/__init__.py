"""The shipped run configs (YAML). Installed as ``omnibyte.configs``; ``omnibyte list configs`` lists them."""
