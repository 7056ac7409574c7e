"""Data: labelled-folder discovery, robust image decoding, preprocessing, aligned fakes."""
