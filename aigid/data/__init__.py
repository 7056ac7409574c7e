"""Data: image sources (folders, tar/zip shards, list files), robust decoding (PIL workers, DALI
on the GPU), scan batches, labelled-folder discovery, preprocessing, perturbations, aligned fakes."""
