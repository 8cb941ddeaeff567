"""The browser dashboard: static HTML/CSS/JS served at `/`; it fetches its data with the user's key."""
