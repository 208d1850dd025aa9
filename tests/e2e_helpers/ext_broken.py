"""Test extension whose setup() fails: the script must say so and run without it."""


def setup(app):
    raise RuntimeError("ext_broken refuses to load")
