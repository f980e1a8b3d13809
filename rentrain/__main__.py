from rentrain.cli import main

main()
