"""Working with finished runs and stores: put new images into existing clusters (``assign``), check a
collection for near-duplicates, outliers and likely mislabels (``check``), and compare two runs
(``compare``). The array computations are in ``neighbours`` and ``runs``; the other modules read and write
folders.
"""
