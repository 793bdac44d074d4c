from cronmesh.cli.main import main

main()
