"""Benchmarks of ESamp (benchmarks/README.md). Installed as ``esamp_sgl.benchmarks``: modules of the
package import each other relatively; scripts run by path import ``esamp_sgl.benchmarks`` (the install).
"""
