"""`megadoc megadocs`: simple, stitch and stretch megadocs from real documents and generations."""
