"""What goes out: result exports, the Markdown report, progress over a batch."""
