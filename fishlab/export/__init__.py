"""Writers at the edge, next to checkpoint I/O: each a thin mapping of names and types onto another tool's
format. `gguf`: one file in the layout s2.cpp loads. `hub`: a staged folder + model card for the Hugging Face
hub."""
