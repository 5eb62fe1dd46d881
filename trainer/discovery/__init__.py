"""Discovery and co-segmentation in an image collection (paper section 5), at a cost that grows
with the number of images times the neighbours kept, not with its square.

- ``pairs``: the network's predictions for each image and its first-stage neighbours (both
  directions, batched, saved as they are made: resumable).
- ``graph``: the sparse correspondence graph of Eq. 4 (vertices: confident correspondences;
  edges: cycle consistency through a third image, weighted by the masks).
- ``spectral``: sparse eigenvectors of that graph, foreground potentials per image.
- ``coseg``: a potential seeding GrabCut, one mask per image.
- ``clusters``: K-means on several eigenvectors, clusters of repeated regions as an HTML page.
- ``metrics``: precision P and Jaccard J of Table 5, and the datasets' folder layouts.
- ``run``: ``trainer discover``, the chain in order.

Shared array conventions: every image is seen at one resolution, a grid of (h, w) cells; a cell
is named by its flat index ``row * w + col``; correspondences are x then y normalised to [0, 1]
of the other image, cell centres at (col + 0.5) / w.
"""
