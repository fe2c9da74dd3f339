"""The frozen base model: detect and load diffusers folders and single files, layout conversion, prompt and image
encoding, hashes, and the builtin demo assets."""
