"""What to do with stored features: probes, clusters, nearest neighbours, maps and plots.

- ``linear_probe``: ``fit_logistic``, every L2 strength in one batched L-BFGS pass.
- ``neighbors``: exact k-nearest-neighbour search over arrays and stores (a store's FAISS
  index when fresh), query vectors from keys or image files, and the kNN probe.
- ``splits``: seeded, stratified (train, validation) splits.
- ``kmeans``: k-means in torch, purity and NMI.
- ``projection``: 2-D coordinates by PCA, t-SNE or UMAP.
- ``plots``: PNG pictures (matplotlib): class columns, maps, neighbours, training curves.
- ``probe_report``, ``cluster_report``, ``search_report``: a store's probe, clustering and
  search results as the commands show them (tables, CSV, plots).
"""
