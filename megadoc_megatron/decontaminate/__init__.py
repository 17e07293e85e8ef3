"""`megadoc decontaminate`: synthetic records that quote held-out or benchmark text, found and dropped."""
