"""`make bench`: the broker measured side by side with nginx and the upstream itself.

See docs/performance.md for what is measured and the targets; `python -m bench --help` for options.
"""
