"""Documents to model input: extraction of pages, OCR, and chunks of long documents."""
