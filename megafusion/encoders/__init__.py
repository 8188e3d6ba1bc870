"""megafusion.encoders"""
