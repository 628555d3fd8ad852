"""fishlab: a research workbook for quantizing Fish Audio's S2 Pro text-to-speech model.

Modules follow the data flow config -> checkpoint -> (quantize) -> checkpoint' -> model -> samples -> metrics
-> report; see README.md.
"""
__version__ = "0.1.0"
