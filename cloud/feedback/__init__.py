"""The store-learning loop, cloud side: collect kiosk feedback, review it, feed it back into builds."""
