"""The store staff dashboard: a static page (MQTT.js over websockets) and the server that hands it out."""
